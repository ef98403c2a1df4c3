from nar4rec.cli import main

raise SystemExit(main())
