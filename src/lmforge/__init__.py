"""lmforge: train small LLaMA-family language models from raw text to a Hugging Face export."""

import os

# Intel MKL may pick a different summation order for the same matmul depending on how the
# buffers happen to be aligned, so two processes can differ in the last bits (seen in fp32 on a
# Xeon). STRICT makes results independent of alignment: what a bit-exact resume needs. MKL reads
# it at its first call, so setting it on import of lmforge is early enough; a user's value wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
