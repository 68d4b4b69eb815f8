"""What turns a prompt or an image into what a transformer takes, and latents back into images.

    tokenizers.py      CLIP / T5 token ids as the SD3 / FLUX pipelines build them
    clip.py, t5.py     the CLIP-L/G and T5-XXL text towers
    clip_t5_text.py    SD3Text / FluxText / ChromaText: their states as each family takes them
    decoder_lm.py      Mistral-Small, Qwen3, Qwen2.5-VL and Qwen3-VL decoder LMs as text encoders
    chat_tokenizer.py  the chat LMs' tokenizers (byte-level BPE); tekken.py Mistral's Tekken
    prompts.py         prompts -> states with a decoder LM, as the official pipelines template them
    vae.py             the AutoencoderKL of SD3 / FLUX.1 and FLUX.2's (32 channels, patchified)
    wan_vae.py         Qwen-Image's VAE; qwen21_vae.py Qwen-Image 2.1's
"""
