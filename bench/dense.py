"""Dense baseline benchmark (same as `deluceva bench dense`): python bench/dense.py [--model M] [--threads T]."""

from deluceva.cli import app

if __name__ == "__main__":
    app(["bench", "dense", *__import__("sys").argv[1:]])
