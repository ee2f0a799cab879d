"""Stand-in ``torchtext.vocab`` module with a bare ``Vocab`` class."""


class Vocab:
    """Placeholder base class; scGPT's ``GeneVocab`` subclasses it."""

    def __init__(self, vocab=None):
        self.vocab = vocab
