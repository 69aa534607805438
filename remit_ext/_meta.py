"""The module ``csrc/registration.cpp`` names as the home of its ops' fakes
(``m.impl_abstract_pystub("remit_ext._meta")``, loaded by the C++ library). torch requires a C++
op's ``register_fake`` to be called from that module, so the calls for ``remit_ext::*`` are made
here; the fakes and the autograd they register are in ``_fakes_autograd``. Once
registration.cpp names ``remit_ext._fakes_autograd``, these lines move there and this file goes.
"""

from __future__ import annotations

import torch

from ._fakes_autograd import FAKES, register_autograd

for _name, _fake in FAKES.items():
    torch.library.register_fake(f"remit_ext::{_name}")(_fake)
register_autograd("remit_ext", FAKES)
