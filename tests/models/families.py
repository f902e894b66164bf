"""Tiny random-weight configs (2–3 layers) of every MoE family msc is tested on.

Each is small enough to compile and run in seconds on a CPU but keeps what makes its family different:
DeepSeek-V3 keeps a dense first layer, MLA with a value width unlike the key width, and group-limited
routing; GPT-OSS keeps sliding-window and full layers, sinks and biases; Qwen2-MoE keeps its gated shared
expert; DBRX keeps its clipped fused QKV.
"""
from __future__ import annotations

_COMMON = dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES: dict[str, dict] = {
    "mixtral": dict(_COMMON, model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                      num_hidden_layers=2, num_experts=6, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True),
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                        num_key_value_heads=4),
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", hidden_size=64, intermediate_size=48, head_dim=16,
                    num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    "dbrx": dict(model_type="dbrx", vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                 ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2}),
}

# Families with no adapter of their own: captured and split by the generic adapter.
GENERIC_FAMILIES: dict[str, dict] = {
    "olmoe": dict(_COMMON, model_type="olmoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                  num_experts=6, num_experts_per_tok=2),
    "glm4_moe": dict(_COMMON, model_type="glm4_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=2, n_group=2, topk_group=1, head_dim=16, use_qk_norm=True),
    "ernie4_5_moe": dict(_COMMON, model_type="ernie4_5_moe", hidden_size=64, intermediate_size=128,
                         moe_intermediate_size=32, num_hidden_layers=2, moe_num_experts=6, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=0, head_dim=16),
    # PhiMoE routes with a custom autograd.Function (sparsemixer); GraniteMoE stores its experts under other names
    "phimoe": dict(_COMMON, model_type="phimoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                   num_local_experts=4, num_experts_per_tok=2),
    # DeepSeek-V2: MLA (the latent cache) with a complex-number rotary embedding
    "deepseek_v2": dict(_COMMON, model_type="deepseek_v2", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4),
    "granitemoe": dict(_COMMON, model_type="granitemoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                       num_local_experts=4, num_experts_per_tok=2),
}

# Families with state layers (issue 26): the layer types keep both kinds, the state layers' sizes tiny.
STATE_FAMILIES: dict[str, dict] = {
    "qwen3_next": dict(_COMMON, model_type="qwen3_next", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                       head_dim=16, layer_types=["linear_attention", "full_attention", "linear_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                       linear_conv_kernel_dim=4),
    "qwen3_5_moe_text": dict(_COMMON, model_type="qwen3_5_moe_text", hidden_size=64, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, num_hidden_layers=3, num_experts=6,
                             num_experts_per_tok=2, head_dim=16,
                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_conv_kernel_dim=4),
    # the composite (vision-language) config of the same model: its causal LM reads the text config
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", text_config=dict(
        _COMMON, model_type="qwen3_5_moe_text", hidden_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)),
    "lara_mini": dict(_COMMON, model_type="lara_mini", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                      head_dim=16, layer_types=["linear_attention", "sliding_attention", "full_attention"],
                      sliding_window=4, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_conv_kernel_dim=4),
    "granitemoehybrid": dict(_COMMON, model_type="granitemoehybrid", hidden_size=64, intermediate_size=48,
                             shared_intermediate_size=32, num_hidden_layers=3, num_local_experts=6,
                             num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4,
                             mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=1,
                             mamba_chunk_size=8),
    "jamba": dict(_COMMON, model_type="jamba", hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                  num_experts=6, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                  expert_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "kimi_linear": dict(_COMMON, model_type="kimi_linear", hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_hidden_layers=3, num_experts=6, num_experts_per_token=2,
                        num_shared_experts=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, head_dim=16,
                        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_head_dim=8,
                        linear_num_heads=4, linear_conv_kernel_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Nemotron-H: one kind of block a layer (Mamba-2, MoE with up-only ReLU² experts, attention), its MoE layers
    # mix no tokens at all
    "nemotron_h": dict(_COMMON, model_type="nemotron_h", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, num_hidden_layers=4, n_routed_experts=6,
                       num_experts_per_tok=2, n_group=1, topk_group=1, head_dim=16,
                       layer_types=["mamba", "moe", "attention", "moe"], mamba_num_heads=4, mamba_head_dim=16,
                       n_groups=2, ssm_state_size=8, conv_kernel=4, expand=1, chunk_size=8),
    # MiniMax: lightning attention (decayed linear attention, blocks of 4 so transformers' blockwise scan crosses
    # blocks) beside softmax attention
    "minimax": dict(_COMMON, model_type="minimax", hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                    num_local_experts=6, num_experts_per_tok=2, head_dim=16, block_size=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention"]),
}

# Indexed sparse attention (DeepSeek's DSA): the indexer keeps 4 positions a query, so the 11-token prompts and
# the decode steps after them attend to a strict subset of their past
SPARSE_FAMILIES: dict[str, dict] = {
    "deepseek_v32": dict(FAMILIES["deepseek_v3"], model_type="deepseek_v32", index_topk=4, index_head_dim=16,
                         index_n_heads=2),
}

# the state families that run (lara_mini is refused: its checkpoint fuses projections msc's reader cannot split);
# the composite qwen3_5_moe is the text model's config inside another, tested by the family survey
RUNNING_STATE_FAMILIES = {k: STATE_FAMILIES[k] for k in ("qwen3_next", "qwen3_5_moe_text", "granitemoehybrid", "jamba",
                                                            "kimi_linear", "nemotron_h", "minimax")}
