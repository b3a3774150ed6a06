from vae_dist.cli import main

raise SystemExit(main())
