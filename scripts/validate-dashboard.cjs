// Validates Grafana dashboard JSON files against a JSON schema generated from the
// `Dashboard` type of the npm package @grafana/schema (the classic dashboard model,
// dist/types/raw/dashboard/x/types.gen.d.ts), with ts-json-schema-generator and ajv.
//
// usage: node scripts/validate-dashboard.cjs NPM_DIR DASHBOARD.json...
// NPM_DIR holds node_modules with @grafana/schema, ts-json-schema-generator and ajv
// (scripts/test.sh installs them into .tools/npm). Exits non-zero on any violation.
//
// The generated schema is strict: objects the types describe field by field reject
// unknown fields, so a misspelt key fails; fields typed as free-form records in the
// types (panel `options`, `fieldConfig.defaults.custom`) are not checked further.
'use strict';
const path = require('path');
const fs = require('fs');
const { createRequire } = require('module');

const [npmDir, ...files] = process.argv.slice(2);
if (!npmDir || files.length === 0) {
  console.error('usage: validate-dashboard.cjs NPM_DIR DASHBOARD.json...');
  process.exit(2);
}
const req = createRequire(path.join(path.resolve(npmDir), 'package.json'));
const tsj = req('ts-json-schema-generator');
const Ajv = req('ajv');

const schemaPkg = path.dirname(req.resolve('@grafana/schema/package.json'));
const types = path.join(schemaPkg, 'dist/types/raw/dashboard/x/types.gen.d.ts');
const schema = tsj
  .createGenerator({ path: types, type: 'Dashboard', skipTypeCheck: true, additionalProperties: false })
  .createSchema('Dashboard');
const version = JSON.parse(fs.readFileSync(path.join(schemaPkg, 'package.json'), 'utf8')).version;

const ajv = new Ajv({ allErrors: true, strict: false });
const validate = ajv.compile(schema);
let failed = false;
for (const file of files) {
  const dashboard = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (validate(dashboard)) {
    console.log(`${file}: valid against @grafana/schema ${version} Dashboard`);
  } else {
    failed = true;
    for (const e of validate.errors) {
      console.error(`${file}: ${e.instancePath || '/'} ${e.message} ${JSON.stringify(e.params)}`);
    }
  }
}
process.exit(failed ? 1 : 0);
