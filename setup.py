from setuptools import find_packages, setup


def tree(folder: str, name: str) -> list[str]:
    return [name] + [f"{name}.{p}" for p in find_packages(folder)]


# One distribution, one import root: the top-level kernels/, weights/ and samplers/
# folders install as mmdit.kernels, mmdit.weights and mmdit.samplers.
setup(
    name="mmdit-dg",
    version="0.1.0",
    description="Standalone SD3 / SD3.5 / FLUX.1 MMDiT with Detail Guidance (massive-activation disruption)",
    python_requires=">=3.10",
    packages=tree("mmdit", "mmdit") + tree("kernels", "mmdit.kernels") + tree("weights", "mmdit.weights")
    + tree("samplers", "mmdit.samplers"),
    package_dir={
        "mmdit": "mmdit",
        "mmdit.kernels": "kernels",
        "mmdit.weights": "weights",
        "mmdit.samplers": "samplers",
    },
    package_data={"mmdit.weights": ["*.json", "tiny/*"]},
    install_requires=[
        "torch>=2.6",  # torch.library.triton_op / wrap_triton (the fused kernels under torch.compile)
        "safetensors>=0.4",
        "huggingface_hub>=0.24",  # imported only when a hub repo id is given
        "tokenizers>=0.19",  # imported only when a pipeline with real text encoders loads
        "numpy",
        "pillow",
    ],
    # triton is an extra: on CUDA, torch brings its own; on a CPU it is never used (the kernels'
    # torch references run), except by the tests, which run the kernels in Triton's interpreter.
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "diffusers==0.42.1", "transformers>=4.45", "protobuf",
                 "sentencepiece>=0.2", "matplotlib", "peft>=0.17", "gguf>=0.19",
                 "triton>=3.0; platform_system == 'Linux'"],
        "triton": ["triton>=3.0; platform_system == 'Linux'"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mmdit=mmdit.cli:main"]},
)
