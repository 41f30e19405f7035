from setuptools import find_packages, setup

setup(
    name="mass-moerging",
    version="0.1.0",
    description="MASS: deploy many fine-tuned CLIP vision models as one (data-free MoErging with Triton kernels)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mass", "mass.*", "mass_kernels", "mass_kernels.*"]),
    package_data={"mass.tools.demo": ["assets/pretrained_clip/*"]},  # the demo's committed pretrained CLIP
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "hf": ["transformers>=4.40"],
        # mass eval: hub/local datasets (datasets does not pull torchvision), PIL preprocessing, plots
        "eval": ["transformers>=4.40", "datasets>=2.14", "pillow>=10", "matplotlib>=3.7"],
        # mass serve: Ray Serve (FastAPI, uvicorn, aiohttp, requests come with it), multipart bodies, image decoding
        "serve": ["ray[serve]>=2.60", "python-multipart>=0.0.9", "pillow>=10", "transformers>=4.40"],
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "matplotlib>=3.7",
            "scikit-learn>=1.3",
            "pillow>=10",
            "transformers>=4.40",
            "datasets>=2.14",
            "ray[serve]>=2.60",
            "python-multipart>=0.0.9",
            "peft==0.21.2",  # tests/test_lora.py checks LoRA adapters against PEFT's merge_and_unload
        ],
    },
    entry_points={"console_scripts": ["mass=mass.tools.cli:main"]},
)
