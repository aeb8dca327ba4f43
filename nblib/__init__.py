"""nblib: the small library behind "LLMs from scratch, in Jupyter notebooks".

Each module is one idea a lesson taught, written once so later lessons can import it:

- ``runmode``: FAST/full switch, device, seeding (``nblib.setup`` is the config cell's call)
- ``data``: data sets by name, checked against sha256, cached, offline-capable
- ``names``: the names data set with the course's fixed train/dev/test split
- ``tokenizers``: the real GPT-2 tokenizer, offline
- ``progress``: progress bars
- ``checks``: exercise checks a learner runs on their own code
"""
from nblib.runmode import is_fast, pick_device, seed_everything, setup

__version__ = "0.1.0"
__all__ = ["setup", "is_fast", "pick_device", "seed_everything", "__version__"]
