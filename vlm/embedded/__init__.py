"""The embedded default: what lets the project run end to end with nothing downloaded.

- `synthetic.py` — the "coloured shapes" VQA data set (images, questions, captions, text corpus).
- `tiny_backbones.py` — a tiny timm ViT and a tiny Llama (+ BPE tokenizer), briefly pre-trained on
  that domain and saved in their libraries' own formats; `tiny_siglip.py` — a tiny transformers
  SigLIP tower, pre-trained the same way.

Nothing in the core (model, fusion, encoders, data, train, hub, eval) imports from here: the core
loads these backbones and data exactly as it loads hub models and user files.
"""
