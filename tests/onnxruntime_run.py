"""Runs an ONNX model in onnxruntime for tests/onnx.rs, after onnx's full
checker (schemas, types and shape inference).

usage: onnxruntime_run.py MODEL OUT_PREFIX NAME=FILE:DTYPE:D0,D1,... ...
Each input is raw little-endian data of DTYPE (float32, int32, int64); each
output K of the model is written to OUT_PREFIX.K as raw float32, and its shape
to OUT_PREFIX.K.shape.
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort

model_path, out_prefix, *specs = sys.argv[1:]
onnx.checker.check_model(onnx.load(model_path), full_check=True)
feeds = {}
for spec in specs:
    name, rest = spec.split("=", 1)
    path, dtype, dims = rest.split(":")
    shape = [int(d) for d in dims.split(",")] if dims else []
    feeds[name] = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
for k, out in enumerate(sess.run(None, feeds)):
    np.asarray(out, dtype="<f4").tofile(f"{out_prefix}.{k}")
    with open(f"{out_prefix}.{k}.shape", "w") as f:
        f.write(",".join(str(d) for d in out.shape))
