"""clue_adv: noise, adversarial training and gradient penalties for BERT on CLUE TNEWS/IFLYTEK."""

__version__ = "0.1.0"
