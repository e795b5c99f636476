from .attention import attention, resolve_backend
from .block import Attention, Block, compile_blocks, run_blocks
from .patch_embed import PatchEmbed3D
from .pos_embed import sincos_2d_table, sincos_3d_table, sincos_table

__all__ = ["attention", "resolve_backend", "Attention", "Block", "compile_blocks", "run_blocks", "PatchEmbed3D", "sincos_table", "sincos_2d_table", "sincos_3d_table"]
