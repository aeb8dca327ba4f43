"""``python -m nblib.chat_sft``: lesson 15's supervised fine-tuning stage (with your identity conversations); see ``nblib.stages``."""
from nblib.pretrain import cli
from nblib.stages import main


if __name__ == "__main__":
    cli(lambda: main("sft"))
