"""Darknet cfg parser + Yolo-Fastest 1.1 XL against cv2.dnn 4.12's reference outputs on real video frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from deluceva.errors import ModelError
from deluceva.zoo.base import Geometry, nms_per_class
from deluceva.zoo.darknet import YoloDarknet, decode_head, load_darknet
from deluceva.zoo.darknet_cfg import parse_cfg
from deluceva.zoo.darknet_net import DarknetNetwork, load_weights

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "src/deluceva/zoo/weights/yolo-fastest-1.1-xl-coco"
CFG = MODEL_DIR / "yolo-fastest-1.1-xl.cfg"
WEIGHTS = MODEL_DIR / "yolo-fastest-1.1-xl.weights"
REF = ROOT / "tests/data/yolo-fastest-1.1-xl-coco/reference_outputs.npz"
VIDEO = ROOT / "assets/video"
CV2_THRESH = (
    0.2  # cv2's yolo layer zeroes class scores below this (smallest non-zero score in the reference: 0.2046)
)


def _frames(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """RGB frames by 0-based decode index (sequential decode, as the reference was made)."""
    out: dict[int, np.ndarray] = {}
    with av.open(str(path)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i in wanted:
                out[i] = fr.to_ndarray(format="rgb24")
            if len(out) == len(wanted):
                break
    return out


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def det() -> YoloDarknet:
    d = load_darknet(CFG)
    assert isinstance(d, YoloDarknet)
    return d


@pytest.fixture(scope="module")
def heads(det, ref) -> tuple[torch.Tensor, ...]:
    x = torch.from_numpy(ref["input_uint8_NHWC"].transpose(0, 3, 1, 2) / 255.0).float()
    with torch.inference_mode():
        return det.network(x)


def test_model_metadata(det):
    assert det.family == "darknet" and det.native_hw == (320, 320)
    assert len(det.class_names) == 80 and det.class_names[0] == "person"
    assert [h.stride for h in det.heads] == [16, 32]  # largest map first
    assert det.heads[0].anchors == ((12, 18), (37, 49), (52, 132))
    assert det.heads[1].anchors == ((115, 73), (119, 199), (242, 238))


def test_preprocess_reproduces_reference_input(det, ref):
    frames = _frames(VIDEO / "car-detection.mp4", set(ref["frame_indices"].tolist()))
    for k, i in enumerate(ref["frame_indices"]):
        x, geo = det.preprocess(frames[int(i)], (320, 320))
        expected = torch.from_numpy(ref["input_uint8_NHWC"][k].transpose(2, 0, 1) / 255.0).float()
        assert torch.equal(x[0], expected), f"frame {i}"
    assert geo.source_hw == (432, 768) and geo.scale_xy == (320 / 768, 320 / 432)


@pytest.mark.parametrize("index, key", [(0, "head_raw/permute_130"), (1, "head_raw/permute_121")])
def test_heads_match_cv2_on_all_frames(heads, ref, index, key):
    expected = torch.from_numpy(ref[key][:, 0])  # (20, h, w, 255)
    got = heads[index].permute(0, 2, 3, 1)
    assert got.shape == expected.shape
    err = (got - expected).abs().amax(dim=(1, 2, 3))
    # 10x stricter than 1e-3 of the scale: BN eps 1e-5 instead of darknet/cv2's 1e-6 would fail (2.7e-2 abs)
    assert err.max() <= 1e-4 * expected.abs().max(), f"per-frame max abs err {err.tolist()}"


def test_intermediate_blobs(det, ref):
    """cv2 fuses BN into conv_0, so its blob is the BN output. conv_60 / bn_61 are checked for shape only:
    their values (blobs of layers cv2 fused) match no tensor of the network, the heads match to 1e-4."""
    caught: dict[str, torch.Tensor] = {}
    layers = det.network.layers
    hooks = [
        layers[0].block.bn.register_forward_hook(lambda m, i, o: caught.__setitem__("conv_0", o)),
        layers[60].block.conv.register_forward_hook(lambda m, i, o: caught.__setitem__("conv_60", o)),
        layers[61].block.bn.register_forward_hook(lambda m, i, o: caught.__setitem__("bn_61", o)),
    ]
    x = torch.from_numpy(ref["input_uint8_NHWC"][:1].transpose(0, 3, 1, 2) / 255.0).float()
    try:
        with torch.inference_mode():
            det.network(x)
    finally:
        for h in hooks:
            h.remove()
    for name, got in caught.items():
        assert got.shape == ref[f"frame0_intermediate/{name}"].shape, name
    conv0 = torch.from_numpy(ref["frame0_intermediate/conv_0"])
    assert (caught["conv_0"] - conv0).abs().max() <= 1e-3 * conv0.abs().max()


def test_decode_matches_cv2(det, heads, ref):
    for index, key in [(0, "out/yolo_130"), (1, "out/yolo_121")]:
        for f in range(len(ref["frame_indices"])):
            boxes, scores = decode_head(heads[index][f : f + 1], det.heads[index], (320, 320))
            cv = ref[key][f]
            np.testing.assert_allclose(boxes / 320.0, cv[:, :4], atol=1e-4)
            shown = cv[:, 5:] > 0
            np.testing.assert_allclose(scores[shown], cv[:, 5:][shown], atol=1e-4)
            assert not (scores[~shown] > CV2_THRESH + 1e-4).any()  # nothing cv2 kept is missing
    assert (ref["out/yolo_130"][..., 5:] > det.conf_threshold).any()  # the comparison is not vacuous


def test_detections_match_cv2_end_to_end(det, ref):
    """Video frame -> detections equals cv2's decoded output put through the same threshold + NMS."""
    frames = _frames(VIDEO / "car-detection.mp4", set(ref["frame_indices"].tolist()))
    total = 0
    for k, i in enumerate(ref["frame_indices"]):
        got = det(frames[int(i)])
        cv = np.concatenate([ref["out/yolo_130"][k], ref["out/yolo_121"][k]])
        rows, cls = np.nonzero(cv[:, 5:] > det.conf_threshold)
        b = cv[rows, :4] * 320
        xyxy = np.concatenate((b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2), 1)
        keep = nms_per_class(xyxy, cv[rows, 5 + cls], cls, det.iou_threshold)
        geo = Geometry((432, 768), (320, 320), (320 / 768, 320 / 432), (0.0, 0.0))
        assert len(got) == len(keep), f"frame {i}"
        np.testing.assert_array_equal(got.class_ids, cls[keep])
        np.testing.assert_allclose(got.scores, cv[rows, 5 + cls][keep], atol=1e-4)
        np.testing.assert_allclose(got.boxes, geo.to_source(xyxy[keep]), atol=0.05)
        total += len(got)
    assert total > 0


def test_fx_trace_keeps_conv_bn_act(det, ref):
    gm = torch.fx.symbolic_trace(det.network)
    mods = dict(gm.named_modules())
    kinds = [type(mods[n.target]) for n in gm.graph.nodes if n.op == "call_module"]
    n_conv = sum(s.kind == "convolutional" for s in parse_cfg(CFG))
    assert (
        kinds.count(nn.Conv2d) == n_conv and kinds.count(nn.BatchNorm2d) == n_conv - 2
    )  # heads: bias, no BN
    x = torch.from_numpy(ref["input_uint8_NHWC"][:1].transpose(0, 3, 1, 2) / 255.0).float()
    with torch.inference_mode():
        for a, b in zip(gm(x), det.network(x), strict=True):
            assert torch.equal(a, b)


def test_person_on_video_at_native_and_768x448(det):
    rgb = _frames(VIDEO / "one-by-one-person-detection.mp4", {300})[300]
    x, _ = det.preprocess(rgb, (448, 768))
    with torch.inference_mode():
        shapes = [tuple(o.shape) for o in det.network(x)]
    assert shapes == [(1, 255, 28, 48), (1, 255, 14, 24)]
    people = []
    for hw in [(320, 320), (448, 768)]:
        d = det(rgb, hw)
        best = np.flatnonzero(d.class_ids == 0)
        assert len(best) and d.scores[best[0]] > 0.9, f"no confident person at {hw}"
        people.append(d.boxes[best[0]])
    (a, b) = people
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    iou = inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)
    assert iou > 0.8 and a[3] - a[1] > 300  # the same, standing (tall) person in the 768x432 frame


# --- Parser semantics on a small tiny-YOLO-style cfg with random weights -------------------------------

TINY_CFG = """[net]
width=96
height=64
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=mish
[route]
layers=-1
groups=2
group_id=1
[convolutional]
filters=8
size=1
stride=1
activation=swish
[route]
layers = -1,-2
[maxpool]
size=2
stride=1
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=1,2
anchors=10,14, 23,27, 37,58
classes=2
num=3
scale_x_y=1.05
[route]
layers=-4
[upsample]
stride=2
[route]
layers=-1,0
[convolutional]
filters=7
size=1
stride=1
activation=linear
[yolo]
mask=0
anchors=10,14, 23,27, 37,58
classes=2
num=3
"""


def _write_tiny(tmp_path: Path, extra_floats: int = 0) -> Path:
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    net = DarknetNetwork(parse_cfg(cfg))
    n = sum(p.numel() for p in net.parameters()) + sum(
        b.numel() for b in net.buffers() if b.dtype.is_floating_point
    )
    rng = np.random.default_rng(0)
    vals = rng.normal(0, 0.3, n + extra_floats).astype(np.float32)
    vals[:] = np.abs(vals) + 0.5  # positive: valid BN variances wherever they fall
    header = np.array([0, 1, 0, 0], np.int32).tobytes()  # major 0, minor 1: 32-bit 'seen'
    (tmp_path / "tiny.weights").write_bytes(header + vals.tobytes())
    return cfg


def test_tiny_cfg_semantics(tmp_path):
    cfg = _write_tiny(tmp_path)
    det = load_darknet(cfg)
    assert det.class_names == ["class0", "class1"] and det.native_hw == (64, 96)
    assert [h.stride for h in det.heads] == [1, 2] and det.heads[1].scale_x_y == 1.05
    assert det.heads[1].anchors == ((23, 27), (37, 58))
    net = det.network
    x = torch.rand(1, 3, 64, 96)
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o)) for layer in net.layers]
    with torch.inference_mode():
        outs = net(x)
        for h in hooks:
            h.remove()
        gm = torch.fx.symbolic_trace(net)
        assert all(torch.equal(a, b) for a, b in zip(gm(x), outs, strict=True))
    assert [tuple(o.shape) for o in outs] == [(1, 7, 64, 96), (1, 14, 32, 48)]
    assert torch.equal(seen[3], seen[2][:, 8:16])  # route groups=2 group_id=1: second half of the channels
    assert torch.equal(seen[5], torch.cat((seen[4], seen[3]), 1))  # route -1,-2
    # maxpool size=2 stride=1 keeps the size: window [y, y+1] x [x, x+1], -inf past the right/bottom edge
    pad = torch.nn.functional.pad(seen[5], (0, 1, 0, 1), value=float("-inf"))
    expected = torch.stack([pad[..., dy : dy + 32, dx : dx + 48] for dy in (0, 1) for dx in (0, 1)]).amax(0)
    assert torch.equal(seen[6], expected)
    assert seen[1].shape[2:] == (32, 48) and seen[10].shape[2:] == (64, 96)  # maxpool 2/2, upsample 2
    assert torch.equal(seen[10], seen[9].repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(seen[8], seen[7]) and torch.equal(outs[1], seen[7])  # [yolo] passes its input through
    boxes, scores = decode_head(outs[1], det.heads[1], (64, 96))
    assert boxes.shape == (32 * 48 * 2, 4) and scores.shape == (32 * 48 * 2, 2)


def test_tiny_cfg_runs_at_other_sizes(tmp_path):
    det = load_darknet(_write_tiny(tmp_path))
    with torch.inference_mode():
        outs = det.network(torch.rand(1, 3, 96, 160))
    assert [tuple(o.shape[2:]) for o in outs] == [(96, 160), (48, 80)]


# --- Errors: one-line ModelError naming the file / section ---------------------------------------------


def test_cfg_without_weights(tmp_path):
    shutil.copy(CFG, tmp_path / "m.cfg")
    with pytest.raises(ModelError, match=r"weights not found: .*m\.weights"):
        load_darknet(tmp_path / "m.cfg")


@pytest.mark.parametrize(
    "edit, what",
    [("last value cut", "truncated"), ("half", "truncated"), ("4 bytes more", "larger than the cfg needs")],
)
def test_wrong_size_weights(tmp_path, edit, what):
    data = WEIGHTS.read_bytes()
    data = {"last value cut": data[:-4], "half": data[: len(data) // 2], "4 bytes more": data + bytes(4)}[
        edit
    ]
    (tmp_path / "w.weights").write_bytes(data)
    with pytest.raises(ModelError, match=what) as e:
        load_darknet(CFG, tmp_path / "w.weights")
    assert "w.weights" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("\x00\x01garbage bytes\nmore", r"line 1: expected 'key=value'"),
        ("width=3\n[net]\n", r"before the first \[section\]"),
        ("[convolutional]\nfilters=3\n", r"must start with a \[net\]"),
        ("[net]\n", r"no layers"),
        ("[net]\n[convolutional\n", r"line 2: malformed section header"),
        (
            "[net]\n[convolutional]\nfilters=abc\n",
            r"line 2: \[convolutional\] \(layer 0\): option filters='abc'",
        ),
        ("[net]\n[convolutional]\nfilters=4\n[foo]\n", r"\[foo\] \(layer 1\): unsupported darknet section"),
        ("[net]\n[convolutional]\nactivation=gelu\n", r"unsupported activation 'gelu'"),
        (
            "[net]\n[convolutional]\nfilters=4\n[route]\nlayers=-3\n",
            r"\[route\] \(layer 1\): refers to layer -3",
        ),
        ("[net]\n[convolutional]\nfilters=4\n", r"no \[yolo\] layer"),
        (
            "[net]\n[convolutional]\nfilters=4\n[yolo]\nclasses=1\nanchors=1,2\n",
            r"input has 4 channels, expected",
        ),
    ],
)
def test_malformed_cfg(tmp_path, text, message):
    cfg = tmp_path / "bad.cfg"
    cfg.write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelError, match=message) as e:
        load_darknet(cfg, WEIGHTS)
    assert "bad.cfg" in str(e.value) and "\n" not in str(e.value)


def test_missing_cfg(tmp_path):
    with pytest.raises(ModelError, match="cfg not found"):
        load_darknet(tmp_path / "nope.cfg")


def test_weights_shorter_than_header(tmp_path):
    (tmp_path / "e.weights").write_bytes(bytes(8))
    with pytest.raises(ModelError, match="too short for a darknet weights header"):
        load_weights(DarknetNetwork(parse_cfg(CFG)), tmp_path / "e.weights")
