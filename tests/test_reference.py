from pathlib import Path

from clue_adv.reference import config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_config_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == config_reference(), (
        "docs/CONFIG.md is stale: run `python -m clue_adv.reference > docs/CONFIG.md`"
    )


def test_reference_documents_every_field():
    text = config_reference()
    for needle in ("`optim.lr`", "`data.path`", "`model.architecture.hidden_size`", "### `fgm`", "`strategy.epsilon`"):
        assert needle in text
