from cirlab.cli import main

raise SystemExit(main())
