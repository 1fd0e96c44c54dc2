"""Train ONE hypernetwork that generates the connectors of all configured encoders (on cached embeddings).

    accelerate launch scripts/learn_multi_mapper.py --config configs/cc595k_ie12.yaml [key=value ...]
"""
from hnet.cli import train_script

if __name__ == "__main__":
    train_script("hypernet", __doc__)
