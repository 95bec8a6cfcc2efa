from vsotools.cli import main

raise SystemExit(main())
