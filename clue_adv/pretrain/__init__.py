"""`clue-adv pretrain`: masked-language-model pretraining on a task's own text, so a model fine-tunes from language.

    config.py   the pretrain config (typed, unknown fields are errors), loading and --set
    text.py     the text (the task's train split, never dev or test, or a local text file), held-out slice, tokens
    masking.py  batches in a seeded order, dynamic padding, BERT's masking (15%, 80/10/10)
    mlm.py      the model, logits at the masked positions only, held-out evaluation
    run.py      the loop: AdamW with warmup and decay, a step or time budget, checkpoints, resume, the output model

Imports stay inside the submodules: `clue_adv.pretrain.config` is read by `clue-adv validate` without torch's
training machinery.
"""
