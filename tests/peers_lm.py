"""transformers peers for the decoder-LM text encoders: tiny random models of the four classes
the pipelines load, run the way the pipelines run them, and writers for every file layout.

Test-only (imports transformers). The configs follow the research notes (flux2.md 8.3,
qwen_image.md 9.2): Qwen3Config's head_dim and MistralConfig's sliding_window are overridden,
since their defaults (128, 4096) are not what the tiny sizes mean.
"""
from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
STD = 0.05  # noise on every weight, so ones-initialised norms don't hide wiring mistakes
KINDS = ("mistral3", "qwen3", "qwen2_5_vl", "qwen3_vl")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict(keep_vars=True).items()):
            if t.dtype.is_floating_point:
                t.add_(torch.randn(t.shape, generator=g) * STD)
    return model.eval()


def mistral3(vocab=VOCAB, layers=3, seed=0, **text):
    cfg = T.Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                         pad_token_id=0, **text),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=32, patch_size=8, num_channels=3),
        image_token_index=min(10, vocab - 1), spatial_merge_size=2)
    torch.manual_seed(seed)
    return randomize(T.Mistral3ForConditionalGeneration(cfg), seed)


def qwen3(vocab=VOCAB, layers=3, seed=0, **text):
    cfg = T.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        rope_theta=1e6, tie_word_embeddings=True, **text)
    torch.manual_seed(seed)
    return randomize(T.Qwen3ForCausalLM(cfg), seed)


def qwen2_5_vl(vocab=VOCAB, layers=3, seed=0, **ids):
    cfg = T.Qwen2_5_VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": layers,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab, "rope_theta": 1e6,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 32},
        **_vl_ids(vocab, ids))
    torch.manual_seed(seed)
    return randomize(T.Qwen2_5_VLForConditionalGeneration(cfg), seed)


def qwen3_vl(vocab=VOCAB, layers=3, seed=0, **ids):
    cfg = T.Qwen3VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 32, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        **_vl_ids(vocab, ids))
    torch.manual_seed(seed)
    return randomize(T.Qwen3VLForConditionalGeneration(cfg), seed)


def _vl_ids(vocab: int, ids: dict) -> dict:
    """The VL configs' special ids must lie in the vocabulary (defaults are the real 151k ids)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {n: ids.get(n, vocab - 1 - i) for i, n in enumerate(names)}


BUILD = {"mistral3": mistral3, "qwen3": qwen3, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl}


def language_model(peer) -> torch.nn.Module:
    """The peer's decoder stack (the module our DecoderLM mirrors)."""
    return peer.model.language_model if hasattr(peer.model, "language_model") else peer.model


@torch.no_grad()
def hidden_states(peer, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """transformers' ``output_hidden_states`` as the pipelines request them (the last one is post-norm)."""
    return peer(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states


@torch.no_grad()
def pre_norm_last(peer, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The last layer's output before the final norm, the way the Qwen-Image 2.1 pipeline gets it
    (a forward hook on the norm that returns its input)."""
    norm = language_model(peer).norm
    handle = norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        return peer(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    finally:
        handle.remove()


def padded_batch(lengths: list[int], L: int, side: str, vocab: int = VOCAB, pad: int = 0, seed: int = 1):
    """(ids, mask) of random tokens (never ``pad``), each row padded on ``side`` to L."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(1, vocab, (n,), generator=g)
        span = slice(L - n, L) if side == "left" else slice(0, n)
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


# --- tiny tokenizers carrying the real chat templates ---------------------------------------------

# Mistral-Small-3.1-24B-Instruct-2503's processor chat template (as transformers' Mistral3
# processor test carries it); FLUX.2 [dev] renders its system message + user turn through it.
MISTRAL_TEMPLATE = (
    "{%- set today = strftime_now(\"%Y-%m-%d\") %}\n{%- set default_system_message = \"You are Mistral Small 3, a "
    "Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base "
    "was last updated on 2023-10-01. The current date is \" + today + \".\\n\\nWhen you're not sure about some "
    "information, you say that you don't have the information and don't make up anything.\\nIf the user's question is "
    "not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not "
    "try to answer it right away and you rather ask the user to clarify their request (e.g. \\\"What are some good "
    "restaurants around me?\\\" => \\\"Where are you?\\\" or \\\"When is the next flight to Tokyo\\\" => \\\"Where do "
    "you travel from?\\\")\" %}\n\n{{- bos_token }}\n\n{%- if messages[0]['role'] == 'system' %}\n    {%- if "
    "messages[0] is string %}\n        {%- set system_message = messages[0]['content'] %}\n        {%- set "
    "loop_messages = messages[1:] %}\n    {%- else %} \n        {%- set system_message = messages[0]['content'][0]"
    "['text'] %}\n        {%- set loop_messages = messages[1:] %}\n    {%- endif %}\n{%- else %}\n    {%- set "
    "system_message = default_system_message %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{{- "
    "'[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n\n{%- for message in loop_messages %}\n    {%- if "
    "message['role'] == 'user' %}\n            {%- if message['content'] is string %}\n            {{- '[INST]' + "
    "message['content'] + '[/INST]' }}\n            {%- else %}\n                    {{- '[INST]' }}\n              "
    "      {%- for block in message['content'] %}\n                            {%- if block['type'] == 'text' %}\n  "
    "                                  {{- block['text'] }}\n                            {%- elif block['type'] == "
    "'image' or block['type'] == 'image_url' %}\n                                    {{- '[IMG]' }}\n               "
    "                 {%- else %}\n                                    {{- raise_exception('Only text and image "
    "blocks are supported in message content!') }}\n                                {%- endif %}\n                  "
    "      {%- endfor %}\n                    {{- '[/INST]' }}\n                {%- endif %}\n    {%- elif "
    "message['role'] == 'system' %}\n        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}\n   "
    " {%- elif message['role'] == 'assistant' %}\n        {%- if message['content'] is string %}\n            {{- "
    "message['content'] + eos_token }}\n        {%- else %}\n            {{- message['content'][0]['text'] + "
    "eos_token }}\n        {%- endif %}\n    {%- else %}\n        {{- raise_exception('Only user, system and "
    "assistant roles are supported!') }}\n    {%- endif %}\n{%- endfor %}")

_QWEN3_BODY = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
"""
# Qwen3 (the hybrid-thinking Qwen3-4B / 8B release FLUX.2 [klein] uses): the body above, then
# the generation prompt that enable_thinking=False closes with an empty think block.
QWEN3_TEMPLATE = _QWEN3_BODY + """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen3-VL-8B-Instruct's chat template, up to the message loop: Qwen-Image 2.1 renders only a
# system turn through it (to count the tokens it drops).
QWEN3_VL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
# words merged whole, so the templates tokenize as the real vocabulary does (Qwen-Image's 34-token
# prefix, 2.1's 14-token system turn)
# (bare pieces last: their merges must not pre-empt those of the Ġ-words)
QWEN_WORDS = ("system user assistant Describe Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture Ġquantity "
              "Ġtext Ġspatial Ġrelationships Ġof Ġobjects Ġand Ġbackground Ġanalyze Ġprovided Ġprompt Ġa Ġphoto "
              "Ġcat Ġdog Ġred Ġon Ġmars Ġriding Ġhorse Com preh end").split()


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_qwen_tokenizer(folder, chat_template: str, padding_side: str = "right"):
    """A Qwen2Tokenizer (byte-level BPE, the Qwen split regex, NFC) over the 256 byte symbols
    plus whole-word merges, with Qwen's special tokens; saved as transformers 5 saves it."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for w in QWEN_WORDS:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                merges.append((w[:k - 1], w[k - 1]))
                vocab[w[:k]] = len(vocab)
    tok = T.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", padding_side=padding_side)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return T.AutoTokenizer.from_pretrained(folder)


MISTRAL_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 10: "[IMG]", 11: "<pad>",
                    12: "[IMG_BREAK]", 13: "[IMG_END]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]"}
# Tekken's pre-tokenizer split (the corrected pattern transformers applies with fix_mistral_regex)
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def write_mistral_tokenizer(folder, corpus: list[str], vocab_size: int = 400, padding_side: str = "left"):
    """A Tekken-like byte-level BPE (specials at Tekken's ids, BOS added by the post-processor as in
    the hub's tokenizer.json), saved with Mistral-Small-3.1's chat template, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_special = max(MISTRAL_SPECIALS) + 1
    specials = [MISTRAL_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(n_special)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="<pad>", padding_side=padding_side, chat_template=MISTRAL_TEMPLATE)
    tok.save_pretrained(folder)
    return T.AutoTokenizer.from_pretrained(folder)


# --- file layouts ---------------------------------------------------------------------------------

def lm_state_dict(peer) -> dict[str, torch.Tensor]:
    """The language model's tensors in our (= transformers' language-model) names."""
    return dict(language_model(peer).state_dict())


def legacy_state_dict(peer, kind: str) -> dict[str, torch.Tensor]:
    """The peer's tensors in transformers 4.x (< 4.52) names, which transformers 5 still reads:
    Mistral3 ``language_model.model.*`` / ``language_model.lm_head`` / ``vision_tower.*``;
    Qwen2.5-VL ``model.*`` / ``visual.*``. Qwen3ForCausalLM never changed, and Qwen3-VL came after
    the rename (4.57), so only its config.json differs."""
    out = {}
    for k, v in peer.state_dict().items():
        if kind == "mistral3":
            k = "language_model.lm_head.weight" if k == "lm_head.weight" else k
            for new, old in [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                             ("model.multi_modal_projector.", "multi_modal_projector.")]:
                k = old + k[len(new):] if k.startswith(new) else k
        elif kind == "qwen2_5_vl":
            for new, old in [("model.language_model.", "model."), ("model.visual.", "visual.")]:
                k = old + k[len(new):] if k.startswith(new) else k
        out[k] = v
    return out


def legacy_config(peer) -> dict:
    """config.json as transformers 4.x wrote it: ``rope_theta`` (+ ``rope_scaling``) instead of
    v5's ``rope_parameters``; Qwen2.5-VL's text fields at the top level, its M-RoPE typed "mrope"."""
    cfg = peer.config.to_dict()
    text = cfg.get("text_config", cfg)
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    if cfg.get("model_type") == "qwen2_5_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        cfg.update(cfg.pop("text_config"))
    elif "mrope_section" in rope:  # Qwen3-VL (4.57+): {"rope_type": "default", "mrope_section", "mrope_interleaved"}
        text["rope_scaling"] = rope
    return cfg


def comfy_state_dict(peer, kind: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A ComfyUI text-encoder file: the language model under ``model.``, the LM head, and what
    ComfyUI keeps beside it (the Qwen-VL vision tower as ``visual.*``; Mistral's tokenizer
    JSON as a uint8 ``tekken_model`` tensor)."""
    out = {prefix + k: v for k, v in lm_state_dict(peer).items()}
    out["lm_head.weight"] = peer.lm_head.weight
    if kind in ("qwen2_5_vl", "qwen3_vl"):
        out.update({k[len("model."):]: v for k, v in peer.state_dict().items() if k.startswith("model.visual.")})
    if kind == "mistral3":
        out["tekken_model"] = torch.frombuffer(bytearray(b'{"config": {}, "vocab": []}'), dtype=torch.uint8)
    return out


class TextOnlyQwen3VLProcessor:
    """What ``Qwen3VLProcessor`` does for text-only calls, which is all Qwen-Image 2.1's t2i path
    asks of it (transformers 5.24 can't build the real one without torchvision, which the venv
    lacks): ``apply_chat_template`` renders the chat template and tokenizes the text as a batch
    (ProcessorMixin: no special tokens added when the text starts with BOS; Qwen has none);
    ``__call__`` tokenizes and adds ``mm_token_type_ids`` (all 0 for text)."""

    def __init__(self, tokenizer, chat_template: str = QWEN3_VL_TEMPLATE):
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def apply_chat_template(self, conversation, tokenize=False, return_dict=False, **kwargs):
        text = self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  **kwargs)
        if not tokenize:
            return text
        out = self(text=[text])
        return out if return_dict else out["input_ids"]

    def __call__(self, text, images=None, padding=False, padding_side=None, return_tensors=None, **kwargs):
        if images is not None:
            raise NotImplementedError("text only: image conditioning needs the real processor (torchvision)")
        out = self.tokenizer(text, padding=padding, padding_side=padding_side, return_tensors=return_tensors)
        out["mm_token_type_ids"] = torch.zeros_like(out["input_ids"]) if return_tensors == "pt" else \
            [[0] * len(ids) for ids in out["input_ids"]]
        return out


def write_tekken(path, tokenizer, n_special: int = 24) -> None:
    """A tekken.json with the tiny Mistral tokenizer's vocabulary: its specials at ranks 0..18
    (gaps named <SPECIAL_i>), ``n_special`` special slots, byte strings by rank (id order)."""
    import base64
    import json

    symbols = {c: b for b, c in bytes_to_unicode().items()}
    inner = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i > max(MISTRAL_SPECIALS))
    vocab = [{"rank": r, "token_bytes": base64.b64encode(bytes(symbols[c] for c in t)).decode(), "token_str": None}
             for r, (_, t) in enumerate(inner)]
    specials = [{"rank": i, "token_str": MISTRAL_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                for i in range(max(MISTRAL_SPECIALS) + 1)]
    config = {"pattern": TEKKEN_SPLIT, "num_vocab_tokens": len(vocab) + n_special,
              "default_vocab_size": len(vocab) + n_special, "default_num_special_tokens": n_special, "version": "v7"}
    path.write_text(json.dumps({"config": config, "vocab": vocab, "special_tokens": specials}))
