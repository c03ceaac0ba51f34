"""A tiny character SentencePiece model for the unit tests."""

import sentencepiece as spm

SENTENCES = ["HELLO WORLD", "THE CAT SAT ON THE MAT", "A QUICK BROWN FOX", "JUMPS OVER THE LAZY DOG", "IT'S FINE"]


def char_tokenizer(folder, vocab_size: int = 28, bos_id: int = -1, eos_id: int = -1) -> str:
    """Train a character model in ``folder`` (``<unk>`` = 0); returns the ``.model`` path."""
    text = folder / "text.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "chars"),
        model_type="char",
        vocab_size=vocab_size,
        character_coverage=1.0,
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return str(folder / "chars.model")
