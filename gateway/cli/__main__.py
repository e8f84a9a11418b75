import sys

from mlx_supervisor.gateway.cli.main import main

sys.exit(main())
