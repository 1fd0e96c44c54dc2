"""Train one independent connector per encoder (the APE grid-search baseline), all batched in one step, on the
same cached embeddings and loop as the hypernetwork.

    accelerate launch scripts/learn_separate_mapper.py --config configs/cc595k_ie12.yaml [key=value ...]
"""
from hnet.cli import train_script

if __name__ == "__main__":
    train_script("separate", __doc__)
