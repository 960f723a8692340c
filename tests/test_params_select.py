"""select_parameters: by layer index, glob or regex pattern, predicate; the union of criteria; errors
that name the criterion, the model and example names."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learnmask.params import select_parameters
from tests.conftest import tiny_bert

# a BertLayer holds 16 parameters: q, k, v, attention output, intermediate and output dense
# (weight and bias each: 12) and two LayerNorms (weight and bias: 4)
PER_LAYER = 16


@pytest.fixture
def bert():
    return tiny_bert(layers=3)


def names_starting(model, *prefixes):
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def test_one_layer_selects_exactly_its_parameters(bert):
    chosen = select_parameters(bert, layers=[1])
    assert list(chosen) == names_starting(bert, "bert.encoder.layer.1.")
    assert len(chosen) == PER_LAYER
    assert all(chosen[name] is param for name, param in bert.named_parameters() if name in chosen)


def test_negative_indices_count_from_the_top(bert):
    assert list(select_parameters(bert, layers=-1)) == names_starting(bert, "bert.encoder.layer.2.")
    assert list(select_parameters(bert, layers=[-3])) == list(select_parameters(bert, layers=0))


def test_layers_come_back_in_model_order_whatever_order_they_are_given(bert):
    chosen = select_parameters(bert, layers=[2, 0])
    assert list(chosen) == names_starting(bert, "bert.encoder.layer.0.", "bert.encoder.layer.2.")
    assert len(chosen) == 2 * PER_LAYER


def test_glob_matches_whole_names(bert):
    chosen = select_parameters(bert, pattern="*.LayerNorm.weight")
    # two LayerNorms per layer and one in the embeddings
    assert len(chosen) == 3 * 2 + 1
    assert all(name.endswith(".LayerNorm.weight") for name in chosen)
    # a glob without a wildcard is an exact name, not a substring
    assert list(select_parameters(bert, pattern="classifier.bias")) == ["classifier.bias"]


def test_regex_is_searched_anywhere_in_the_name(bert):
    assert list(select_parameters(bert, pattern=r"re:layer\.0\.")) == list(select_parameters(bert, layers=0))
    assert list(select_parameters(bert, pattern="re:^classifier")) == ["classifier.weight", "classifier.bias"]


def test_criteria_are_a_union(bert):
    chosen = select_parameters(bert, layers=[0], pattern=["classifier.*", "re:pooler"],
                               predicate=lambda name, param: name == "bert.embeddings.word_embeddings.weight")
    expected = names_starting(bert, "bert.embeddings.word_embeddings.", "bert.encoder.layer.0.", "bert.pooler.",
                              "classifier.")
    assert list(chosen) == expected
    assert len(chosen) == 1 + PER_LAYER + 2 + 2


def test_predicate_sees_the_parameter(bert):
    chosen = select_parameters(bert, predicate=lambda name, param: param.dim() == 2 and param.shape[0] == 3)
    assert list(chosen) == ["classifier.weight"]  # (num_labels, hidden) = (3, 32)


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, 5), min_size=1))
def test_a_predicate_over_names_selects_exactly_those_names_in_model_order(picked):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)])
    names = [name for name, _ in model.named_parameters()]
    wanted = {names[i] for i in picked}
    assert list(select_parameters(model, predicate=lambda name, _: name in wanted)) == [n for n in names if n in wanted]


def test_no_criterion_is_an_error(bert):
    with pytest.raises(ValueError, match="at least one of layers=, pattern=, predicate="):
        select_parameters(bert)


def test_a_pattern_matching_nothing_names_pattern_model_and_examples(bert):
    with pytest.raises(ValueError) as err:
        select_parameters(bert.bert, pattern="encoder.layer.99.*")
    message = str(err.value)
    assert message.startswith("pattern 'encoder.layer.99.*' matches no parameter of BertModel; its parameters are "
                              "named like 'encoder.layer.")
    assert message.endswith("(55 in all)")  # embeddings 5 + 3 layers * 16 + pooler 2


def test_one_bad_pattern_in_a_list_is_an_error(bert):
    with pytest.raises(ValueError, match=r"pattern 'classifer\.\*' matches no parameter of "
                                         r"BertForSequenceClassification; .*'classifier\.weight'"):
        select_parameters(bert, pattern=["bert.pooler.*", "classifer.*"])


def test_a_predicate_matching_nothing_is_named(bert):
    def never(name, param):
        return False

    with pytest.raises(ValueError, match=r"predicate .*never matches no parameter of BertForSequenceClassification"):
        select_parameters(bert, predicate=never)


def test_layer_out_of_range_names_the_depth(bert):
    with pytest.raises(ValueError, match=r"layer 3 is out of range: BertForSequenceClassification has 3 "
                                         r"transformer layers \(indices -3\.\.2\)"):
        select_parameters(bert, layers=[0, 3])
    with pytest.raises(ValueError, match="layer -4 is out of range"):
        select_parameters(bert, layers=-4)


@pytest.mark.parametrize("layers, message", [([], r"layers=\[\] selects nothing"),
                                             ([1.0], "layer index 1.0 is not an integer"),
                                             ([True], "layer index True is not an integer")])
def test_bad_layer_lists(bert, layers, message):
    with pytest.raises(ValueError, match=message):
        select_parameters(bert, layers=layers)


def test_layers_on_a_model_without_transformer_layers():
    with pytest.raises(ValueError, match="no transformer layers found in Linear; select its parameters with pattern="):
        select_parameters(nn.Linear(2, 2), layers=0)


def test_bad_patterns(bert):
    with pytest.raises(ValueError, match=r"pattern 're:layer\(' is not a valid regular expression: missing \)"):
        select_parameters(bert, pattern="re:layer(")
    with pytest.raises(ValueError, match=r"pattern=\[\] selects nothing"):
        select_parameters(bert, pattern=[])
    with pytest.raises(ValueError, match="pattern 3 is not a string"):
        select_parameters(bert, pattern=[3])


def test_a_model_without_parameters():
    with pytest.raises(ValueError, match="ReLU has no parameters to select"):
        select_parameters(nn.ReLU(), pattern="*")
