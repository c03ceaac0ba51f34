"""Decoding exits: CTC greedy and beam search, the attention decoders' joint search, and
the word n-gram LM they can use."""
