"""Small hand-made shop data shared by the modelling tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

START = pd.Timestamp("2011-01-01", tz="UTC")
CUTOFF = pd.Timestamp("2011-03-01", tz="UTC")


def make_purchases(n_users: int = 30, n_items: int = 20, seed: int = 7) -> pd.DataFrame:
    """Return canonical purchase events of two taste groups over three months.

    Users u00..u14 buy items i00..i09, the others i10..i19; each user places five orders
    of three items spread over January to March 2011.
    """
    rng = np.random.default_rng(seed)
    half = n_items // 2
    rows = []
    for user in range(n_users):
        group = range(0, half) if user < n_users // 2 else range(half, n_items)
        for order in range(5):
            day = START + pd.Timedelta(days=int(rng.integers(0, 85)))
            for item in rng.choice(list(group), size=3, replace=False):
                rows.append(
                    {
                        "event_id": f"e{len(rows)}",
                        "user_id": f"u{user:02d}",
                        "item_id": f"i{item:02d}",
                        "event_type": "purchase",
                        "quantity": int(rng.integers(1, 5)),
                        "price": 1.0 + item,
                        "ts": day,
                        "order_id": f"o{user:02d}{order}",
                        "country": "United Kingdom" if user % 3 else "France",
                        "batch_id": "test",
                    }
                )
    return pd.DataFrame(rows)
