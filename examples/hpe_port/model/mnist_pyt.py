"""An HPE Swarm Learning PyTorch script, ported to swarmnode by changing its import line.

It follows the structure and every SwarmCallback call of HPE's ``examples/mnist-pyt`` program
(written anew here, not copied): settings from environment variables, ``SwarmCallback`` built with
HPE's camelCase parameters (``syncFrequency``, ``minPeers``, ``useAdaptiveSync``, ``adsValData``,
``adsValBatchSize``, ``model``, ``totalEpochs``, ``lossFunction`` / ``metricFunction`` given as
class names with their ``...Args`` dictionaries), ``on_train_begin()``, ``on_batch_end()`` after
each batch, ``on_epoch_end(epoch)``, ``on_train_end()``, and ``swarmCallback.logger``.

The data is the 8x8 handwritten digits (scikit-learn's copy, nothing is downloaded) in HPE's
``mnist.npz`` layout (``x_train``, ``y_train``, ``x_test``, ``y_test``) in ``DATA_DIR``.
"""

import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from safetensors.torch import save_file

from swarmnode.pyt import SwarmCallback  # was: from swarmlearning.pyt import SwarmCallback

default_max_epochs = 5
default_min_peers = 2
swSyncInterval = int(os.getenv("SYNC_FREQUENCY", "4"))  # batches between two merges


class mnistNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(64, 128)
        self.dropout = nn.Dropout(0.2)
        self.dense1 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.dense(x))
        x = self.dropout(x)
        return F.log_softmax(self.dense1(x), dim=1)


def loadData(dataDir: str):
    with np.load(os.path.join(dataDir, "mnist.npz")) as d:
        x_train, y_train = d["x_train"].astype(np.float32) / 16.0, d["y_train"].astype(np.int64)
        x_test, y_test = d["x_test"].astype(np.float32) / 16.0, d["y_test"].astype(np.int64)
    train = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    test = torch.utils.data.TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))
    return train, test


def doTrainBatch(model, device, trainLoader, optimizer, epoch, swarmCallback):
    model.train()
    for data, target in trainLoader:
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if swarmCallback is not None:
            swarmCallback.on_batch_end()


def test(model, device, testLoader) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in testLoader:
            pred = model(data.to(device)).argmax(dim=1)
            correct += int((pred == target.to(device)).sum())
    accuracy = correct / len(testLoader.dataset)
    print(f"Test set: accuracy {accuracy:.3f}")
    return accuracy


def main() -> None:
    dataDir = os.getenv("DATA_DIR", "/platform/data")
    scratchDir = os.getenv("SCRATCH_DIR", "/platform/scratch")
    max_epochs = int(os.getenv("MAX_EPOCHS", str(default_max_epochs)))
    min_peers = int(os.getenv("MIN_PEERS", str(default_min_peers)))
    batchSz = 32
    torch.manual_seed(int(os.getenv("SEED", "0")))
    trainDs, testDs = loadData(dataDir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = mnistNet().to(device)
    opt = optim.Adam(model.parameters())
    trainLoader = torch.utils.data.DataLoader(trainDs, batch_size=batchSz, shuffle=True)
    testLoader = torch.utils.data.DataLoader(testDs, batch_size=batchSz)

    swarmCallback = SwarmCallback(syncFrequency=swSyncInterval,
                                  minPeers=min_peers,
                                  useAdaptiveSync=False,
                                  adsValData=testLoader,
                                  adsValBatchSize=batchSz,
                                  model=model,
                                  totalEpochs=max_epochs,
                                  lossFunction="NLLLoss",
                                  lossFunctionArgs={"reduction": "mean"},
                                  metricFunction="F1Score",
                                  metricFunctionArgs={"task": "multiclass", "num_classes": 10})
    swarmCallback.logger.setLevel(logging.INFO)
    swarmCallback.on_train_begin()
    for epoch in range(1, max_epochs + 1):
        doTrainBatch(model, device, trainLoader, opt, epoch, swarmCallback)
        test(model, device, testLoader)
        swarmCallback.on_epoch_end(epoch)
    swarmCallback.on_train_end()

    os.makedirs(os.path.join(scratchDir, "mnist_pyt"), exist_ok=True)
    # HPE's script saves with torch.save(model, ...) (a pickle); safetensors holds the same
    # tensors and is what `swarmnode audit --model` checks against the chain
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(scratchDir, "mnist_pyt", "saved_model.safetensors"))
    print("Saved the trained model!")


if __name__ == "__main__":
    main()
