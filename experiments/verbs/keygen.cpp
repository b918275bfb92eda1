// `attnpilot keygen --out PREFIX`: a CURVE key pair for remote training. Writes
// PREFIX.pub (public key, Z85) and PREFIX.key (secret key, Z85, mode 0600) and prints the
// public key, to be listed in a server's --authorized-keys file or given as --server-key.
#include <iostream>

#include "experiments/cli.h"
#include "transport/security.h"

namespace attnpilot::cli {
namespace {

void add_keygen_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("keygen", "Make a CURVE key pair (PREFIX.pub, PREFIX.key)");
  auto out = std::make_shared<std::string>();
  cmd->add_option("--out", *out, "Path prefix of the key files")->required();
  cmd->callback([out] {
    transport::require_curve();
    const transport::KeyPair k = transport::generate_keypair();
    transport::write_keypair(*out, k);
    std::cout << "public key " << k.public_key << "\n"
              << "wrote " << *out << ".pub and " << *out << ".key (mode 0600)\n";
  });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(keygen, 40, add_keygen_verb);

}  // namespace attnpilot::cli
