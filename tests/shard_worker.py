"""Run under torchrun by tests/test_shards.py: stream two epochs of shards through the training
loader, as training does, and save the labels this rank saw in each epoch."""
import itertools
import json
import sys

import torch

from fcmae import distributed
from fcmae.loader import BatchStream, make_train_loader
from fcmae.shards import ShardImages, open_shard_set

if __name__ == "__main__":
    spec, out, batch_size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    distributed.init_distributed("gloo")
    dataset = ShardImages(open_shard_set(spec), lambda image: torch.zeros(1), labeled=True,
                          batch_size=batch_size, seed=7)
    loader = make_train_loader(dataset, batch_size, workers, torch.device("cpu"), seed=7)
    stream = BatchStream(loader, start_epoch=0)
    seen = [[int(label) for _, labels in itertools.islice(iter(stream), len(stream)) for label in labels]
            for _ in range(2)]
    with open(f"{out}/rank{distributed.rank()}.json", "w") as handle:
        json.dump({"seen": seen, "batches": len(loader)}, handle)
    distributed.cleanup()
