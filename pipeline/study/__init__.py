"""The reproduction study: the paper's comparison, ablations and where the gain comes from (see ``__main__``)."""
