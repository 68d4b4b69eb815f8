from setuptools import setup

# One distribution, one import root: the top-level kernels/, weights/ and samplers/
# folders install as mmdit.kernels, mmdit.weights and mmdit.samplers.
setup(
    name="mmdit-dg",
    version="0.1.0",
    description="Standalone SD3 / SD3.5 / FLUX.1 MMDiT with Detail Guidance (massive-activation disruption)",
    python_requires=">=3.10",
    packages=["mmdit", "mmdit.kernels", "mmdit.weights", "mmdit.samplers"],
    package_dir={
        "mmdit": "mmdit",
        "mmdit.kernels": "kernels",
        "mmdit.weights": "weights",
        "mmdit.samplers": "samplers",
    },
    package_data={"mmdit.weights": ["*.json", "tiny/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "numpy",
        "pillow",
    ],
    extras_require={
        "test": ["pytest>=8", "diffusers==0.42.1", "transformers>=4.45", "protobuf", "matplotlib", "peft>=0.17"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mmdit=mmdit.cli:main"]},
)
