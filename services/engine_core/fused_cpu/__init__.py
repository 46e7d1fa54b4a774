"""The fused CPU decode path of the default fast mode: a C++ extension (csrc/) built once per
machine and cached (extension.py), and the model runner's entry to it (decode.py)."""
