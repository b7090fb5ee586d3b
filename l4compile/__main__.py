from l4compile.cli import main

raise SystemExit(main())
