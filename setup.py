from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="muxserve",
    version="0.1.0",
    description="Serve many LLMs on shared GPUs: placement, a unified KV cache and SM multiplexing",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["muxserve", "muxserve.*"]),
    # Loose bounds here; requirements.txt pins what is tested. torch is never pinned so that a
    # GPU machine keeps its own CUDA build.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "gguf",
        "numpy",
        "PyYAML",
        "msgspec",
        "pyzmq",
        "tqdm",
        "fastapi",
        "uvicorn",
        "prometheus-client",
        "aiohttp",
    ],
    extras_require={"cluster": ["ray>=2.52"]},  # muxserve cluster ... and multi-node replay
    entry_points={"console_scripts": ["muxserve=muxserve.serve:main"]},
)
