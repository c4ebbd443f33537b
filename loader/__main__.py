"""`python -m loader`: the same as the `azaion-loader` command."""

from loader.main import main

raise SystemExit(main())
