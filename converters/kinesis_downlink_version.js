var data = {
    devName: "kitchen_thermostat",
    version: msg.version
};
var result = {
    contentType: "JSON",
    data: JSON.stringify(data),
    metadata: {
        streamName: "tb-test-downlink",
        partitionKey: "123",
    }
};
return result;
