"""Configuration of the table-free models: a GPT-NeoX config plus the fixed input code.

Ships inside every saved model directory (loaded with trust_remote_code), so it imports only
torch, transformers and its sibling `codes.py`.
"""

from huggingface_hub.dataclasses import strict
from transformers import GPTNeoXConfig

from .codes import build_code


@strict
class TableFreeConfig(GPTNeoXConfig):
    r"""
    code_family (`str`, defaults to `"affine"`): `minimal`, `affine` or `hashed` (see codes.py).
    code_bits (`int`, *optional*): code width K'; defaults to K = ceil(log2 vocab_size). `minimal` needs exactly K;
        `affine` and `hashed` accept any K' from K to 62.
    code_seed (`int`, defaults to 0): seed of the affine draw, key of the hashed code.
    affine_preset (`str`, *optional*): `identity` or `gray` instead of a random affine map.
    affine_rows (`list[int]`, *optional*): rows of A as bitmasks; filled from the seed or preset when absent,
        so a saved config is self-describing.
    affine_offset (`int`, *optional*): the vector b as a bitmask.
    code_layout (`str`, defaults to `"tile"`): `tile` or `interleave`.
    code_values (`str`, defaults to `"binary"`): `binary` ({0, 1}) or `bipolar` ({-1, +1}).
    code_scale (`float`, defaults to 1.0): multiplies the code values.
    """

    model_type = "tablefree"
    # No embed_in weight to shard: the code lift is computed per token on whichever device holds the ids.
    base_model_tp_plan = {k: v for k, v in GPTNeoXConfig.base_model_tp_plan.items() if k != "embed_in"}

    code_family: str = "affine"
    code_bits: int | None = None
    code_seed: int = 0
    affine_preset: str | None = None
    affine_rows: list[int] | None = None
    affine_offset: int | None = None
    code_layout: str = "tile"
    code_values: str = "binary"
    code_scale: float | int = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.code_family == "affine" and self.affine_rows is None:
            code = self.build_code()
            self.affine_rows, self.affine_offset = code.rows, code.offset

    def build_code(self):
        """The fixed code this config describes; raises CodeError for settings that cannot work."""
        return build_code(
            self.code_family,
            self.vocab_size,
            self.code_bits,
            seed=self.code_seed,
            affine_preset_name=self.affine_preset,
            rows=self.affine_rows,
            offset=self.affine_offset,
        )


__all__ = ["TableFreeConfig"]
