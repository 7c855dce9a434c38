#!/usr/bin/env node
// A tiny solc front end for py-solc-x: answers `--version` and `--standard-json` (stdin -> stdout)
// with npm solcjs, printing nothing but the answer (solcjs's own CLI prints a banner first).
// The solc package is taken from $SWARMNODE_SOLC_JS when set, else resolved from the repository.
'use strict';

function loadSolc() {
  const where = process.env.SWARMNODE_SOLC_JS || 'solc';
  try {
    return require(where);
  } catch (err) {
    process.stderr.write(
      `cannot load the solc npm package from '${where}': ${err.message}\n` +
        'run `make setup` (npm ci) in the repository, or set SWARMNODE_SOLC_JS to a solc package\n'
    );
    process.exit(2);
  }
}

function readStdin() {
  return require('fs').readFileSync(0, 'utf8');
}

const args = process.argv.slice(2);
if (args.includes('--version')) {
  const solc = loadSolc();
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
} else if (args.includes('--standard-json')) {
  const solc = loadSolc();
  process.stdout.write(solc.compile(readStdin()) + '\n');
} else {
  process.stderr.write('usage: solc.js --version | --standard-json < input.json\n');
  process.exit(2);
}
