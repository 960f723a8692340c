"""Shakespeare text for language modelling: Markdown stripped, fixed split by play."""
import pytest

from learnmask.lm_data import Play, load_shakespeare, split_plays, strip_play_markdown

MARKDOWN = """# Othello

## ACT I

### SCENE I. Venice. A street.

_Enter RODERIGO and
IAGO_

**RODERIGO**  
Tush! never tell me; I take it much unkindly  
That thou, Iago, who hast had my purse\\--  
*Exit.*

**IAGO**  
No, no; he'll __\\[Aside]_ ask me.
"""


def test_markdown_is_reduced_to_the_spoken_lines():
    assert strip_play_markdown(MARKDOWN).splitlines() == [
        "Tush! never tell me; I take it much unkindly That thou, Iago, who hast had my purse--",
        "No, no; he'll ask me.",
    ]


def test_split_is_by_play_fixed_and_disjoint():
    plays = [Play(f"p{i}", "text") for i in range(10)]
    first, again = split_plays(plays, heldout_plays=3), split_plays(plays, heldout_plays=3)
    assert first == again and len(first.heldout) == 3 and len(first.train) == 7
    assert not {p.name for p in first.train} & {p.name for p in first.heldout}
    with pytest.raises(ValueError, match=r"heldout_plays must be in \[1, 9\]"):
        split_plays(plays, heldout_plays=10)


def test_the_installed_plays_load_without_markup():
    plays = load_shakespeare()
    assert len(plays) == 38 and "tragedies/othello" in {p.name for p in plays}
    text = "".join(p.text for p in plays)
    assert 4_000_000 < len(text) < 5_000_000
    assert not any(mark in text for mark in ("**", "_", "#", "\\["))
