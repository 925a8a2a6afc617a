// Validates every resource in a JSON-lines file with the npm `fhir` package (R4), an
// independent validator; Bundles are validated whole and entry by entry.
// usage: node validate.js RESOURCES.jsonl
const fs = require('fs');
const { Fhir } = require('fhir');

const fhir = new Fhir();
const lines = fs.readFileSync(process.argv[2], 'utf8').split('\n').filter(Boolean);
let passed = 0;
let failed = 0;
const types = {};
function check(resource, where) {
  const result = fhir.validate(resource, { errorOnUnexpected: true });
  const errors = result.messages.filter((m) => m.severity === 'error');
  types[resource.resourceType] = (types[resource.resourceType] || 0) + 1;
  if (result.valid && errors.length === 0) {
    passed += 1;
  } else {
    failed += 1;
    console.log(`not ok - ${where} ${resource.resourceType}/${resource.id || ''}: ${JSON.stringify(errors)}`);
  }
  for (const e of resource.entry || []) {
    if (e.resource) check(e.resource, `${where} entry`);
  }
}
lines.forEach((l, i) => check(JSON.parse(l), `line ${i + 1}`));
console.log(`validated: ${JSON.stringify(types)}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
