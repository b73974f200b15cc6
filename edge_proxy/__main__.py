from edge_proxy.cli import main

raise SystemExit(main())
