from __future__ import annotations

from claim_service.cli import main

raise SystemExit(main())
