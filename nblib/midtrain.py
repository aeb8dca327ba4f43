"""``python -m nblib.midtrain``: lesson 15's mid-training stage (the chat format, multiple choice, math); see ``nblib.stages``."""
from nblib.pretrain import cli
from nblib.stages import main


if __name__ == "__main__":
    cli(lambda: main("mid"))
