"""Runtime-like client processes for the cross-process tests: ``python workers.py COMMAND ADDRESS MODEL ...``.

Each prints one JSON line on stdout when its work is done.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from helpers import kv_pattern  # this folder is on sys.path when run as a script


def write(address: str, model: str, request_id: str, tokens: int, seed: float, weight_name: str, value: float):
    """Allocate pages for one request, fill them with the pattern, poke one weight; report what was done."""
    from muxserve.flexstore import FlexStoreClient

    with FlexStoreClient(address, os.environ["MUXSERVE_FLEXSTORE_SECRET"]) as client:
        attached = client.attach(model)
        pages = client.allocate(model, [(request_id, tokens)]).new_pages[request_id]
        view = attached.pool.view(attached.layout)  # (num_pages, 2, page_tokens, head_dim)
        view[torch.tensor(pages, device=attached.device)] = kv_pattern(len(pages), attached.layout, seed,
                                                                        attached.device)
        weight = dict(attached.model.named_parameters())[weight_name]
        old = weight.view(-1)[0].item()
        weight.view(-1)[0] = value
        if attached.device.type == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({"pages": pages, "old_weight": old}), flush=True)
        attached.close()


def hold(address: str, model: str, request_id: str, tokens: int):
    """Attach, take pages, say so, then wait to be killed."""
    from muxserve.flexstore import FlexStoreClient

    client = FlexStoreClient(address, os.environ["MUXSERVE_FLEXSTORE_SECRET"])
    attached = client.attach(model)
    pages = client.allocate(model, [(request_id, tokens)]).new_pages[request_id]
    attached.pool.view(attached.layout)[pages[0]].fill_(1.0)
    print(json.dumps({"pages": pages}), flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *args = sys.argv[1:]
    if command == "write":
        address, model, rid, tokens, seed, weight_name, value = args
        write(address, model, rid, int(tokens), float(seed), weight_name, float(value))
    elif command == "hold":
        address, model, rid, tokens = args
        hold(address, model, rid, int(tokens))
    else:
        sys.exit(f"unknown command {command!r}")
