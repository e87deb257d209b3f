"""`python -m clue_adv` is `clue-adv`."""

from clue_adv.cli import app

if __name__ == "__main__":
    app(prog_name="clue-adv")
