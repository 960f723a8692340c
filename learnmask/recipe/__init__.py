"""What runs a study: configs, the training recipe, the grid runner and the table."""
