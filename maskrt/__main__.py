from maskrt.cli import main

raise SystemExit(main())
