"""Captioning speed (feedback-prop §4.4): decoding throughput and the cost of one feedback-prop iteration.

1. Captions per second of the Show-and-Tell decoder on ResNet-50 features (2048-d): greedy and
   batched beam search (beam 3, 16 words), and, for reference, the same beam search run one image
   at a time. The decoder is untrained, so it rarely emits ``<end>`` and every caption runs the full
   16 steps: the worst case.
2. One feedback-prop iteration of the captioning network (ResNet-50 trunk, object head), with the
   object labels known, next to its floor: a truncated forward and backward from the first pivot
   (``conv10``, the output of layer1) to the object loss, gradient w.r.t. the pivot activation only.
   ``RF-conv10,40`` and ``LF-conv10`` (Table 6 rows): ``(feedback_prop(T) - plain forward) / T``;
   LF with two pivots makes two truncated passes per iteration. Decoding a caption from the refined
   features (what the Table 6 protocol does after every iteration) is listed beside.

Best of ``--repeats``, wall and process-CPU clocks (benchmarks/feedback_prop.py's timers); on CUDA
the clocks are read after a synchronize.

Usage: ``PYTHONPATH=. python benchmarks/captioning.py [--device cpu|cuda] [--threads 2]
[--decode-batch 64] [--vocab 10000] [--size 224] [--batch 2] [--steps 3] [--repeats 3]``
"""
from __future__ import annotations

import argparse
import platform

import torch

from benchmarks.feedback_prop import clocks, since
from topdown.decoder import CaptionNet, ShowAndTell
from topdown.feedback import feedback_prop, multilabel_known_loss


def timed(fn, device, repeats):
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clocks()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = tuple(min(a, b) for a, b in zip(best, since(start)))
    return best


def decoding(args, device):
    dec = ShowAndTell(2048, args.vocab).to(device).eval()
    feats = torch.relu(torch.randn(args.decode_batch, 2048, device=device))  # post-ReLU pooled features
    n = args.decode_batch
    single = min(n, 16)
    cases = {
        "greedy, batched": (lambda: dec.greedy(feats, 16), n),
        "beam 3, batched": (lambda: dec.beam_search(feats, 3, 16), n),
        "beam 3, one image at a time": (lambda: [dec.beam_search(feats[i:i + 1], 3, 16) for i in range(single)],
                                         single),
    }
    dec.greedy(feats[:2], 16)  # warm-up
    rows = []
    for name, (fn, count) in cases.items():
        wall, cpu = timed(fn, device, args.repeats)
        rows.append((name, count, count / wall, count / cpu))
    return rows


def feedback(args, device):
    net = CaptionNet("resnet50", num_objects=80, vocab_size=args.vocab).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = (torch.rand(args.batch, 80, device=device) > 0.9).float()
    loss = multilabel_known_loss(torch.arange(80, device=device), y, key="objects")
    t = args.steps

    def call(layers, method, steps):
        return lambda: feedback_prop(net, x, loss, layers, method=method, steps=steps, lr=3e-3, weight_decay=1e-4)

    def floor():
        trunk = net.trunk
        with torch.no_grad():
            a = trunk.layer1(trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x)))))
        a.requires_grad_(True)
        for _ in range(t):
            h = torch.flatten(trunk.avgpool(trunk.layer4(trunk.layer3(trunk.layer2(a)))), 1)
            torch.autograd.grad(loss({"objects": net.heads["objects"](h)}).sum(), a)

    feats = net(x)["features"]
    call(["conv40"], "rf", 1)()  # warm-up
    times = {"plain": timed(call(["conv10"], "rf", 0), device, args.repeats),
             "floor": timed(floor, device, args.repeats),
             "RF-conv10,40": timed(call(["conv10", "conv40"], "rf", t), device, args.repeats),
             "LF-conv10": timed(call(["conv10"], "lf", t), device, args.repeats),
             "decode beam 3": timed(lambda: net.decode(feats, 3, 16), device, args.repeats)}
    per = {}
    for c in range(2):
        plain, fl = times["plain"][c], times["floor"][c] / t
        per[c] = {"forward": plain, "floor / it": fl,
                  "RF-conv10,40 / it": (times["RF-conv10,40"][c] - plain) / t,
                  "LF-conv10 / it": (times["LF-conv10"][c] - plain) / t,
                  "decode beam 3": times["decode beam 3"][c]}
    return per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=10000, help="caption words (COCO's Karpathy vocabulary: ~9,500)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-feedback", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {device.type} ({name}), {args.threads} threads, torch {torch.__version__}, vocabulary {args.vocab}, "
          f"best of {args.repeats}")

    print(f"\nDecoding {args.decode_batch} ResNet-50 feature vectors, 16 words\n")
    print("| decoder | captions | captions/s (wall) | captions/s (CPU clock) |")
    print("|---|---|---|---|")
    for r in decoding(args, device):
        print("| {} | {} | {:.1f} | {:.1f} |".format(*r))

    if args.skip_feedback:
        return
    per = feedback(args, device)
    print(f"\nFeedback-prop on the captioning network, ResNet-50 at {args.size} px, batch {args.batch}, T={args.steps}; "
          "seconds per image\n")
    keys = list(per[0])
    print("| clock | " + " | ".join(keys) + " | RF / floor | LF / floor |")
    print("|---" * (len(keys) + 3) + "|")
    for c, clock in ((0, "wall"), (1, "cpu")):
        v = per[c]
        cells = " | ".join(f"{v[k] / args.batch:.4f}" for k in keys)
        print(f"| {clock} | {cells} | {v['RF-conv10,40 / it'] / v['floor / it']:.2f} | "
              f"{v['LF-conv10 / it'] / v['floor / it']:.2f} |")


if __name__ == "__main__":
    main()
