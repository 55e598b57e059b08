"""Seconds per ResNet-18 training step (forward + backward) at 64 px, batch 32, 2 threads.

    OMP_WAIT_POLICY=ACTIVE  python benchmarks/thread_spin.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/thread_spin.py

Run both while another job keeps one core busy to see what OpenMP's spinning threads cost on a
shared 2-core machine (docs/BENCHMARKS.md, demo section).
"""
import os
import time

import torch
import torchvision

torch.set_num_threads(2)
net = torchvision.models.resnet18(num_classes=100)
x = torch.randn(32, 3, 64, 64)
for _ in range(2):  # warm-up
    net(x).sum().backward()
start = time.perf_counter()
for _ in range(5):
    net(x).sum().backward()
print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}: {(time.perf_counter() - start) / 5:.3f} s/step")
