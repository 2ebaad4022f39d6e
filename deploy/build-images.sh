#!/usr/bin/env bash
# Builds Stride's two images and pushes them to REGISTRY:
#   REGISTRY/stride       coordinator + CPU worker (deploy/Dockerfile.cpu)
#   REGISTRY/stride-cuda  the CUDA worker (deploy/Dockerfile.cuda)
# then prints the lines that point the overlay at them.
#
#   deploy/build-images.sh ghcr.io/acme [TAG]        # TAG: the crate version
#
# Needs Docker with a builder that can reach the base images (rust, debian,
# nvidia/cuda) and `docker login REGISTRY`; no GPU is needed to build. Set
# PUSH=0 to build only.
set -euo pipefail
cd "$(dirname "$0")/.."
registry=${1:?usage: deploy/build-images.sh REGISTRY [TAG]   (e.g. ghcr.io/acme)}
registry=${registry%/}
tag=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
for image in stride stride-cuda; do
  file=deploy/Dockerfile.cpu
  [ "$image" = stride-cuda ] && file=deploy/Dockerfile.cuda
  echo "== $registry/$image:$tag ($file)"
  docker build -f "$file" -t "$registry/$image:$tag" .
  if [ "${PUSH:-1}" != 0 ]; then
    docker push "$registry/$image:$tag"
  fi
done
cat <<EOT

Point the overlay at them (deploy/k8s/overlays/h100x8/kustomization.yaml,
\`images:\`), for instance:
  cd deploy/k8s/overlays/h100x8 && kustomize edit set image \\
    stride=$registry/stride:$tag stride-cuda=$registry/stride-cuda:$tag
(or edit newName/newTag there by hand), then: kubectl apply -k deploy/k8s/overlays/h100x8
EOT
