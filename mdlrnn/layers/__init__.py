"""nn.Modules on the scan core: pLSTM (P/D modes, 1D/2D/3D) and LightNet (attention, MD-TPE, MD-LRPE)."""

from .lightnet import MDTPE, LightNetAttention, md_lrpe_angles
from .plstm import PLSTM, PLSTM1D, PLSTM2D, PLSTM3D

__all__ = ["MDTPE", "PLSTM", "PLSTM1D", "PLSTM2D", "PLSTM3D", "LightNetAttention", "md_lrpe_angles"]
